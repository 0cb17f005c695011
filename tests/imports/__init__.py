"""Tests of the CSV import pipeline's pure parts: reader and validator."""
