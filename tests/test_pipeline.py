import pytest

from evo_rewrite import PipelineError, format_pipeline, parse_pipeline


def test_empty_pipeline():
    assert parse_pipeline("") == []
    assert parse_pipeline(None) == []


def test_parse_options_and_roundtrip():
    passes = parse_pipeline("test-noise(scale=0.01, mode=none),test-corrupt(target='a.b.weight',factor=2)")
    assert [p.name for p in passes] == ["test-noise", "test-corrupt"]
    assert passes[0].scale == 0.01 and passes[0].mode == "none"
    assert passes[1].target == "a.b.weight" and passes[1].factor == 2.0
    text = format_pipeline(passes)
    assert parse_pipeline(text) == passes


def test_default_options_print_bare_name():
    assert format_pipeline(parse_pipeline("test-noise")) == "test-noise"


def test_unknown_pass_suggests_close_name():
    with pytest.raises(PipelineError, match=r"unknown pass 'test-nois'\. Did you mean 'test-noise'\?"):
        parse_pipeline("test-nois")


def test_unknown_option_lists_options():
    with pytest.raises(PipelineError, match=r"pass 'test-noise' has no option 'sclae'; options: scale \(float\), mode \(weights\|none\)"):
        parse_pipeline("test-noise(sclae=1)")


def test_bad_literal_names_allowed_values():
    with pytest.raises(PipelineError, match=r"pass 'test-noise': option mode='all' is not valid; allowed: weights, none"):
        parse_pipeline("test-noise(mode=all)")


def test_bad_type():
    with pytest.raises(PipelineError, match=r"option scale='big' is not valid; expected float"):
        parse_pipeline("test-noise(scale=big)")


def test_post_init_validation_is_a_parse_error():
    with pytest.raises(PipelineError, match=r"pass 'test-noise': scale must be >= 0, got -1.0"):
        parse_pipeline("test-noise(scale=-1)")


@pytest.mark.parametrize("text,msg", [
    ("test-noise(scale=1", "unbalanced"),
    ("test-noise,,test-corrupt", "empty pass name"),
    ("test-noise(scale)", r"option 'scale' needs a value|needs a value"),
    ("test-noise(scale=1,scale=2)", "given twice"),
])
def test_malformed(text, msg):
    with pytest.raises(PipelineError, match=msg):
        parse_pipeline(text)
