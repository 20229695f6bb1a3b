"""The pipeline's stages, one module per store namespace; each declares itself into ``sublim.stage.STAGES``."""
