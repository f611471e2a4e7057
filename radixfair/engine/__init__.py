"""The model executor (torch) and the offline engine API."""
