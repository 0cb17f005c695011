"""A reference FastAPI app: uploads a CSV, enqueues its import, reports progress (README).

uvicorn --factory examples.fastapi_app.app:create_app --no-access-log
"""
