from .adapters import ADAPTERS, COGVIDEOX, DIT, FLUX, HUNYUAN_VIDEO, PIXART, WAN, ModelAdapter, adapter_for, register_adapter

__all__ = ["ADAPTERS", "COGVIDEOX", "FLUX", "DIT", "PIXART", "WAN", "HUNYUAN_VIDEO", "ModelAdapter", "adapter_for", "register_adapter"]
