"""Model definitions. Imports nothing from the rest of kd."""

from kd.models.decoder import Decoder, DecoderConfig, count_params, head_fn, init_params

__all__ = ['Decoder', 'DecoderConfig', 'count_params', 'head_fn', 'init_params']
