"""The quality report's tables: records of the present code apart from earlier ones and variants."""
import pytest

from bench import quality


def record(recipe: str, text: str, ppl: float, bpw: float) -> dict:
    return {"model": "m", "recipe": recipe, "text": text, "ppl": ppl, "bpw_linear": bpw, "bpw_head": 8.5,
            "file_bytes": 1e8}


OURS = [record("dense", "wiki", 10.0, 32.0), record("rtn4g64", "wiki", 12.5, 4.5),
        record("rtn4g64", "c4", 40.25, 4.5), record("bpw3.3", "wiki", 15.0, 3.3),
        record("rtn4g64-span", "wiki", 13.0, 4.5), record("gptq-rtn3g64-dt0.3", "wiki", 16.0, 3.5),
        record("bpw3.3-sampled", "wiki", 15.5, 3.3), record("bpw3.3-t2", "wiki", 14.5, 3.3)]
PEER = [{"model": "m", "type": "Q4_0", "bpw_linear": 4.5, "ppl": {"wiki.txt": {"ppl": 14.0}}}]


def formats(lines: list[str]) -> list[str]:
    return [cells[2].strip() for cells in (line.split("|") for line in lines[4:]) if len(cells) > 2]


def test_present_records_and_llama_cpp_share_one_table_by_falling_bits():
    lines = quality.table("m", OURS, PEER)
    assert lines[0] == "### m"
    assert formats(lines) == ["dense", "rtn4g64", "Q4_0", "bpw3.3"]
    assert "| lutengine | rtn4g64 | 4.50 | 8.50 | 100 | 12.500 | 40.250 |" in lines


def test_suffixed_labels_and_variants_go_to_the_earlier_table():
    lines = quality.table("m", OURS, PEER, earlier=True)
    assert "earlier records" in lines[0]
    assert formats(lines) == ["rtn4g64-span", "gptq-rtn3g64-dt0.3", "bpw3.3-sampled", "bpw3.3-t2"]
    assert quality.table("other", OURS, PEER, earlier=True) == []


def test_sampled_recipes_quantize_without_a_calibration_text():
    assert "--calib" in quality.quantize_args("bpw3.3")
    assert quality.quantize_args("bpw3.3-sampled") == ["--bpw", "3.3"]
    assert "--calib" not in quality.quantize_args("gptq-rtn3g64s8-ao-sampled")
    with pytest.raises(SystemExit, match="-sampled"):
        quality.quantize_args("rtn4g64-sampled")


def test_tuned_recipes_pass_tune_to_gptq_only():
    args = quality.quantize_args("gptq-rtn3g64s8-ao-t2")
    assert args[args.index("--tune") + 1] == "2" and "--act-order" in args
    assert quality.quantize_args("bpw3.3-t2-sampled") == ["--bpw", "3.3", "--tune", "2"]
    assert "--tune" not in quality.quantize_args("bpw3.3")
    with pytest.raises(SystemExit, match="-t"):
        quality.quantize_args("rtn4g64-t2")


def test_integer_grid_and_rtn_plan_recipes():
    assert quality.quantize_args("int5g32") == ["--method", "rtn", "--grid", "int", "--bits", "5", "--group", "32"]
    assert quality.quantize_args("gptq-int5g32")[:4] == ["--method", "gptq", "--grid", "int"]
    assert quality.quantize_args("rtn-bpw5.52") == ["--method", "rtn", "--bpw", "5.52"]
    with pytest.raises(SystemExit, match="rtn plan"):
        quality.quantize_args("rtn-bpw5.52-sampled")


def test_srcgrid_puts_each_layer_on_the_format_of_its_gguf_type(tmp_path, monkeypatch):
    import models.catalog
    from tiny_models import write_gguf

    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    monkeypatch.setattr(models.catalog, "model_path", lambda name: path)
    args = quality.quantize_args("srcgrid", "tiny")
    layers = [a for a in args if "=" in a]
    assert args[:2] == ["--method", "rtn"] and "--calib" not in args
    assert layers and all(a.endswith("_proj.weight=8/32:int") for a in layers)
    assert "model.layers.0.mlp.down_proj.weight=8/32:int" in layers
    assert "--calib" in quality.quantize_args("gptq-srcgrid", "tiny")
