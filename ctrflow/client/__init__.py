"""Client side of ctrflow's serving wire formats: what a bidder links to build request bodies.

Nothing here imports the server or TensorFlow; the server's decoders import the format from here.
"""
from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, COLUMNAR_FORMAT, encode_columnar

__all__ = ["COLUMNAR_CONTENT_TYPE", "COLUMNAR_FORMAT", "encode_columnar"]
