"""Model definitions. Imports nothing from the rest of kd."""

from kd.models.decoder import Decoder, count_params, head_fn, init_params
from kd.models.decoder_config import DecoderConfig
from kd.models.encoder import Encoder, EncoderConfig, init_encoder_params, mean_pool
from kd.models.init_from import select_layers, student_from_teacher
from kd.models.model import Model, Outputs
from kd.models.stacking import stack_layers, unstack_layers

__all__ = ['Decoder', 'DecoderConfig', 'count_params', 'head_fn', 'init_params',
           'Encoder', 'EncoderConfig', 'init_encoder_params', 'mean_pool',
           'Model', 'Outputs', 'select_layers', 'stack_layers', 'student_from_teacher',
           'unstack_layers']
