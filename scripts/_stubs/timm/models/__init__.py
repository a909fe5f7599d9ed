"""Stand-in, see timm/__init__.py."""
