"""Test rig: real servers on loopback ports (S3, email and marketing providers)."""
