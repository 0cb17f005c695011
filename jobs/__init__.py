"""Job coroutines and their domain logic, one domain per module or package."""
