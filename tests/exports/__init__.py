"""Export tests: storage backends and the CSV format."""
