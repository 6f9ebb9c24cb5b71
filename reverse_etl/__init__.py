"""reverse-etl: sync warehouse views into Klaviyo and Dotdigital."""

__version__ = "0.1.0"
