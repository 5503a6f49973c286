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


def test_the_cards_state_privacy_json_statement():
    """The model cards print the statement built once (server.statement), never their own."""
    from server.export import lora_claim, ti_claim

    p = {"statement": "This embedding is (0.999, 1e-05)-differentially private ..."}
    assert ti_claim(p) == lora_claim(p) == p["statement"]


def test_samples_use_the_run_template_and_the_card_shows_it(tiny_sd_path, tmp_path):
    from server.export import generate_samples, model_card

    path = export_embedding(tmp_path, "<S*>", torch.zeros(32))
    samples = generate_samples(str(tiny_sd_path), path, "<S*>", ["an emoji of a cat"], tmp_path / "samples",
                               template="an emoji of a {token} {caption}", steps=1, guidance=1.0, seed=0, device="cpu")
    assert [(s["kind"], s["prompt"]) for s in samples] == [("base", "an emoji of a cat"),
                                                           ("adapted", "an emoji of a <S*> an emoji of a cat")]
    assert (tmp_path / "samples" / "grid.png").is_file()
    privacy = {"adapter": {"token": "<S*>"}, "noise_source": "none", "trust_model": "central", "private": False,
               "statement": "**No privacy guarantee.**",
               "mechanism": "DPAgg-TI", "post_processing": [], "num_sites": 1, "declared_num_images": 4,
               "sample_rate": 1.0, "centered": True, "bound": "clip", "clip_norm": 0.1, "noise_multiplier": 0.0,
               "denominator": 4, "num_releases": 1}
    card = model_card(privacy, {}, samples)
    assert 'pipe("an emoji of a <S*> an emoji of a cat")' in card
    assert card.split("\n")[2] == "**No privacy guarantee.**"  # the statement is the card's first paragraph


def fedavg_privacy(achieved, private=True):
    return {"mechanism": "DP-FedAvg", "defense_description": "plain LoRA", "num_rounds": 2, "num_sites_declared": 4,
            "sample_rate": 1.0, "sampling": "none", "plan": {"local_steps": 2}, "clip_norm": 0.1 if private else None,
            "noise_multiplier": 2.0 if private else 0.0, "achieved_noise_multipliers": achieved, "private": private,
            "denominator": 4.0 if private else "number of sites that answered (plain mean)",
            "adapter": {"rank": 2, "alpha": 2.0, "targets": ["to_q"], "text_encoder": False}}


def test_the_card_states_the_achieved_noise_where_dropouts_lowered_it():
    """Distributed noise with a dropout achieves z*sqrt(s/m) < z: the card states the smallest
    achieved z (and the planned one beside it), never the plan's alone."""
    from server.export import dpagg_steps, fedavg_steps

    lowered = " ".join(fedavg_steps(fedavg_privacy([2.0, 2.0 * (2 / 3) ** 0.5])))
    assert "z*C = 1.633 x 0.1 at the least (the smallest achieved z, lowered from the planned 2 " in lowered
    assert "z*C = 2 x 0.1 was added" in " ".join(fedavg_steps(fedavg_privacy([2.0, 2.0])))
    assert "Non-private" in " ".join(fedavg_steps(fedavg_privacy([], private=False)))  # no clip bound to print
    ti = {"mechanism": "DPAgg-TI", "num_sites": 3, "declared_num_images": 24, "sample_rate": 0.5, "centered": False,
          "bound": "clip", "clip_norm": 0.05, "noise_multiplier": 3.0, "achieved_noise_multipliers": [3.0, 2.5],
          "denominator": 12.0, "num_releases": 2, "post_processing": []}
    assert "z*C = 2.5 x 0.05 at the least" in " ".join(dpagg_steps(ti))


def test_the_ti_card_names_sampling_only_when_there_was_some():
    from server.export import dpagg_steps

    ti = {"mechanism": "DPAgg-TI", "num_sites": 4, "declared_num_images": 400, "sample_rate": 0.5, "centered": True,
          "bound": "clip", "clip_norm": 0.5, "noise_multiplier": 2.5, "denominator": 200.0, "num_releases": 1,
          "post_processing": []}
    sampled = " ".join(dpagg_steps(ti))
    assert "kept with probability q = 0.5 (Poisson sampling)" in sampled and "public expected count q*N = 200" in sampled
    every = " ".join(dpagg_steps({**ti, "sample_rate": 1.0, "denominator": 400.0}))
    assert "Every image was used (q = 1, no sampling), its embedding centred" in every
    assert "Poisson" not in every and "public count q*N = 400" in every
