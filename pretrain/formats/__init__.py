"""Models out: a radalign export written in the layouts other libraries load, with no radalign import.

    open_clip      open_clip_config.json + open_clip_model.safetensors (+ HF tokenizer/config for HF text towers):
                   `open_clip.create_model_and_transforms("local-dir:OUT")`, `open_clip.get_tokenizer("local-dir:OUT")`
    transformers   config.json + model.safetensors + tokenizer + preprocessor_config.json:
                   `transformers.AutoModel.from_pretrained(OUT)` (CLIPModel, VisionTextDualEncoderModel, or our
                   small dual-encoder class shipped beside the weights, loaded with trust_remote_code=True)
    onnx           image_encoder.onnx + text_encoder.onnx + tokenizer files + export.json (opset, inputs, preprocessing)

Every format folder also holds MODEL_CARD.md (pretrain/formats/card.py) and export.json (what was exported, from
which weights, and the round-trip check that was run). The command is `radalign export` (pretrain/share.py).
"""

FORMATS = ("open_clip", "transformers", "onnx")
