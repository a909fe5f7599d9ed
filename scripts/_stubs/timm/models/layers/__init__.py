"""Stand-in for timm.models.layers: only `drop_path`, identity when it is a no-op."""


def drop_path(x, drop_prob=0.0, training=False):
    if drop_prob is None or drop_prob == 0.0 or not training:
        # timm's drop_path is also the identity when not training.
        return x
    raise NotImplementedError(
        "timm stand-in: drop_path with drop_prob > 0 in training mode is not supported"
    )
