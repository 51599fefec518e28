from .adapters import ADAPTERS, DIT, PIXART, WAN, ModelAdapter, adapter_for, register_adapter

__all__ = ["ADAPTERS", "DIT", "PIXART", "WAN", "ModelAdapter", "adapter_for", "register_adapter"]
