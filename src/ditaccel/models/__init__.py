from .adapters import ADAPTERS, DIT, HUNYUAN_VIDEO, PIXART, WAN, ModelAdapter, adapter_for, register_adapter

__all__ = ["ADAPTERS", "DIT", "PIXART", "WAN", "HUNYUAN_VIDEO", "ModelAdapter", "adapter_for", "register_adapter"]
