"""Data: sources, labels, splits, image checks, preprocessing, the uint8 store, shards, augmentation, loaders, tools."""
