def test_pack_loads_in_comfyui(comfyui):
    assert comfyui.pack_module.comfy_entrypoint is not None,  comfyui.nodes.NODE_CLASS_MAPPINGS
