"""The cases the library does not answer clearly yet (issue #9), by case id, with what is missing.

The table test marks each of these ``xfail(strict=True)``: the day a fix lands, the case passes, the XPASS fails the
run, and its line here must be removed. ``python -m tests.bad_inputs.census`` counts them honestly either way.
"""

NOT_YET: dict[str, str] = {
    'unroll:schedule-str':
        'unclear: EnergyInputError: "unknown step \'a\' at schedule position 0; valid names: attention, energy',
    'unroll:tied-str':
        'silent: returned without an error',
    'Unrolled.forward:Y-nan':
        'silent: returned without an error',
    'Unrolled.forward:Y-inf':
        'silent: returned without an error',
    'Unrolled.forward:Y-meta':
        "unclear: RuntimeError (expected ValueError/TypeError): 'Tensor on device cpu is not on the expected",
    'Unrolled.forward:Y-overflow':
        'silent: returned without an error',
    'FFNStep:spectrum-reversed':
        "unclear: EnergyInputError: 'SpectrumClip needs finite bounds lo ≤ hi, got lo=0.9, hi=0.1.' does not",
    'FFNStep:spectrum-above-1':
        'silent: returned without an error',
    'HopfieldStep:beta=0':
        'silent: returned without an error',
    'AttentionStep:alpha=neg':
        'silent: returned without an error',
    'OrthogonalHeads:heads=0':
        'silent: returned without an error',
    'check_constraints:not-a-module':
        'unclear: AttributeError (expected ValueError/TypeError): "\'str\' object has no attribute \'named_modu',
    'yang2022:alpha_att-nan':
        "unclear: EnergyInputError: '`alpha` must be a finite real number, got nan.' does not match ['`alpha",
    'parameter_count:not-a-module':
        'unclear: AttributeError (expected ValueError/TypeError): "\'list\' object has no attribute \'parameter',
    'check_layer:TransformerEncoderLayer':
        "unclear: EnergyInputError: '`layer` must be an nn.MultiheadAttention, an AttentionWeights or a dict",
    'check_layer:rtol-neg':
        'silent: returned without an error',
    'to_energy:alpha-nan':
        'silent: returned without an error',
    'train:loss_fn-not-callable':
        'unclear: TypeError: "\'str\' object is not callable" does not match [\'`loss_fn`|\\\\bloss_fn\\\\b\']',
    'load_model:path-int':
        "unclear: TypeError: 'expected str, bytes or os.PathLike object, not int' does not match ['`path`|\\\\",
    'register_builder:not-callable':
        'silent: returned without an error',
    'measured:tolerance-neg':
        'silent: returned without an error',
    'read_json:corrupt':
        'unclear: JSONDecodeError: "Expecting \',\' delimiter: line 1 column 12 (char 11)" does not match [\'co',
    'save_figure:not-a-figure':
        'unclear: AttributeError (expected ValueError/TypeError): "\'str\' object has no attribute \'savefig\'"',
    'energy:no-command':
        "unclear: exit 2: 'python -m energy: error: the following arguments are required: COMMAND (see pytho",
    'unfold:no-command':
        "unclear: exit 2: 'python -m unfold: error: the following arguments are required: COMMAND (see pytho",
}
