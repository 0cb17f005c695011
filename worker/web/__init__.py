"""The operator console (`console.py`) and the public pages a web app mounts, on Starlette."""
