"""Client side of ctrflow's serving wire formats: what a bidder links to build request bodies.

Nothing here imports the server or TensorFlow; the server's decoders import the format from here.
`FeatureHasher` (spec ctrflow-hash-1) turns raw features into the model's ids; `encode_ids` packs them
into the binary ids body; `IdsClient` does both and posts to a server; `encode_context` packs a
context + candidates request (docs/context.md).
"""
from ctrflow.client.columnar import COLUMNAR_CONTENT_TYPE, COLUMNAR_FORMAT, encode_columnar
from ctrflow.client.context import CONTEXT_CONTENT_TYPE, encode_context
from ctrflow.client.ids import IDS_CONTENT_TYPE, IDS_FORMAT, IdsClient, ServerConnectionError, encode_ids

__all__ = ["COLUMNAR_CONTENT_TYPE", "COLUMNAR_FORMAT", "CONTEXT_CONTENT_TYPE", "IDS_CONTENT_TYPE", "IDS_FORMAT", "IdsClient",
           "ServerConnectionError", "encode_columnar", "encode_context", "encode_ids"]
