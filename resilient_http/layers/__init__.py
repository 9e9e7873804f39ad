"""One module per layer; :mod:`resilient_http._pipeline` puts them in order."""
