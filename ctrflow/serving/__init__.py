"""Serving: the autobatcher, the predictor over an exported model, and the HTTP/gRPC front ends."""
