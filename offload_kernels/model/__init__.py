"""Model-level API: offload(model), placement planning, bandwidth measurement, GGUF model and tokenizer loading."""

from .bandwidth import Hardware, measure_hardware
from .gguf_model import load_gguf_model, load_gguf_tokenizer
from .offload import OffloadReport, offload, streamer_of
from .planner import BudgetError, LinearSpec, Placement, Prediction, parse_bytes, plan_placement, predict_throughput

__all__ = ["BudgetError", "Hardware", "LinearSpec", "OffloadReport", "Placement", "Prediction", "load_gguf_model",
           "load_gguf_tokenizer", "measure_hardware", "offload", "parse_bytes", "plan_placement", "predict_throughput",
           "streamer_of"]
