"""Data: files -> rows -> conversations -> rendered text -> input_ids + labels -> batches."""
