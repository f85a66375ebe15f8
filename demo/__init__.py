"""Built-in demo: a synthetic captioned shapes dataset for quick text-to-image experiments."""
