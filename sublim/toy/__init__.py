"""Small, fast experiments that show subliminal learning without a language model (the MNIST aux-logit toy)."""
