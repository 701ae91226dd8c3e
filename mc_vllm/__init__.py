"""Engine-side client: compressed image embeddings (mc_core.inference.embeds files) into vLLM.

Runs in vLLM's own venv (`make vllm-env`, `.venv-vllm`), whose transformers is older than the
project's, so nothing here imports mc_core beyond `mc_core.inference.embeds` and `mc_core.io`
(torch and
safetensors only). See docs/serving.md.

    inputs   the engine's input for one image: offline `multi_modal_data`, or the OpenAI
             `image_embeds` content part (base64 of a saved tensor)
    offline  `OfflineChat`: multi-turn dialogues through `vllm.LLM.generate`
    server   `ServerChat`: multi-turn dialogues through the OpenAI-compatible server
    replay   `python -m mc_vllm.replay`: run saved dialogues, write the answers as JSON
"""
