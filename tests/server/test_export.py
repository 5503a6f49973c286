import torch
from diffusers import StableDiffusionPipeline

from common.textual_inversion import load_embedding
from server.export import export_embedding


def test_exported_embedding_loads_in_a_fresh_stock_pipeline(tiny_sd_path, tmp_path):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    path = export_embedding(tmp_path, "<S*>", vector)
    assert load_embedding(path)[0] == "<S*>"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, local_files_only=True)
    pipe.load_textual_inversion(str(path), token="<S*>")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<S*>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], vector, rtol=0, atol=0)
