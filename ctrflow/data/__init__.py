"""The data layer: synthetic logs, conversion to binary shards, and the batch pipeline models read from."""
