"""The request handler: query types, candidate sources, filters, scorers and orderers (see README.md)."""
