# TEMP test double (deleted before report): stands in for mc_core.adapters.__init__ until it lands.
import sys, types, torch, importlib
try:
    import mc_core.adapters as A
    A.for_model
except Exception:
    sys.modules.pop("mc_core.adapters", None)
    mod = types.ModuleType("mc_core.adapters"); mod.__path__ = ["mc_core/adapters"]
    sys.modules["mc_core.adapters"] = mod
    import mc_core.adapters.llava as L
    mod.for_model = lambda m: L.LlavaAdapter(m)
    def prompt_attention(model, adapter, inputs, layer=2):
        return [torch.rand(t.shape[0]) for t in adapter.visual_tokens(inputs)]
    mod.prompt_attention = prompt_attention
from bench.__main__ import main
sys.exit(main())
