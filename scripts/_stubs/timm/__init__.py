"""Minimal local stand-in for `timm`, used only so that torchscale 0.3.0 can be imported
by scripts/make_decoder_fixtures.py. torchscale imports `timm.models.layers.drop_path`
for stochastic depth; the fixtures always use drop_path_rate = 0, so only the identity
path is provided. This is NOT the real timm package."""
