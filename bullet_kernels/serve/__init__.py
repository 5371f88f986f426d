"""Serving: scheduler, HTTP server, load generator."""
