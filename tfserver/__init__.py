"""tfserver: Terraform modules as an authenticated HTTPS API."""

__version__ = "0.1.0"
