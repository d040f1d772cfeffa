"""Data: row formats, tokenisation with loss masks, packing and batches."""
