from .adapters import ADAPTERS, DIT, PIXART, ModelAdapter, adapter_for, register_adapter

__all__ = ["ADAPTERS", "DIT", "PIXART", "ModelAdapter", "adapter_for", "register_adapter"]
