"""Model definitions. Imports nothing from the rest of kd."""

from kd.models.decoder import Decoder, DecoderConfig, count_params, head_fn, init_params
from kd.models.encoder import Encoder, EncoderConfig, init_encoder_params, mean_pool

__all__ = ['Decoder', 'DecoderConfig', 'count_params', 'head_fn', 'init_params',
           'Encoder', 'EncoderConfig', 'init_encoder_params', 'mean_pool']
