"""The cases the library does not answer clearly yet (issue #9), by case id, with what is missing.

The table test marks each of these ``xfail(strict=True)``: the day a fix lands, the case passes, the XPASS fails the
run, and its line here must be removed. ``python -m tests.bad_inputs.census`` counts them honestly either way.
"""

NOT_YET: dict[str, str] = {
    'AttentionEnergy.energy:token_mask-all-false':
        'silent: returned without an error',
    'attention_step_fused:Y-meta':
        "unclear: RuntimeError (expected ValueError/TypeError): 'Tensor on device cpu is not on the expected",
    'attention_step_range:lambda_max_W-nan':
        'silent: returned without an error',
    'attention_step_range:kernel-str':
        'unclear: AttributeError (expected ValueError/TypeError): "\'str\' object has no attribute \'psd_gram\'"',
    'FFNEnergy:allow_unbounded-str':
        'silent: returned without an error',
    'tied_relu_energy:Y-list':
        "unclear: TypeError: 'expected Tensor as element 0 in argument 1, but got list' does not match ['`Y`",
    'tied_relu_energy:Y-nan':
        'silent: returned without an error',
    'tied_relu_energy:Y-meta':
        'silent: returned without an error',
    'tied_relu_energy:Y-float32':
        "unclear: RuntimeError (expected ValueError/TypeError): 'expected scalar type Float but found Double",
    'multi_head_attention:x_kv-width':
        "unclear: EnergyInputError: '`W_K` must end with shape (3, 4), got shape (4, 4).' does not match ['`",
    'causal_mask:n_q-neg':
        "unclear: RuntimeError (expected ValueError/TypeError): 'Trying to create tensor with negative dimen",
    'causal_mask:n_q-float':
        "unclear: TypeError: 'ones() takes 1 positional argument but 2 were given' does not match ['`n_q`|\\\\",
    'verify.run:seed-str':
        'unclear: TypeError: \'can only concatenate str (not "int") to str\' does not match [\'`seed`|\\\\bseed\\\\',
    'attention_moments:X-meta':
        "unclear: RuntimeError (expected ValueError/TypeError): 'Tensor on device cpu is not on the expected",
    'attention_output:X-list':
        'unclear: TypeError: "unsupported operand type(s) for @: \'list\' and \'Tensor\'" does not match [\'`X`|\\',
    'attention_output:X-int':
        "unclear: RuntimeError (expected ValueError/TypeError): 'expected m1 and m2 to have the same dtype, ",
    'attention_output:X-nan':
        'silent: returned without an error',
    'attention_loss:X-nan':
        'silent: returned without an error',
    'attention_loss:X-zero':
        "unclear: ZeroDivisionError (expected ValueError/TypeError): 'float division by zero'",
    'attention_moments:scale-neg':
        'silent: returned without an error',
    'attention_hessian:tensor-not-moments':
        'unclear: AttributeError (expected ValueError/TypeError): "\'Tensor\' object has no attribute \'sizes\'"',
    'hessian_blocks:tensor-not-moments':
        'unclear: AttributeError (expected ValueError/TypeError): "\'Tensor\' object has no attribute \'blocks\'',
    'LinearOperator:shape-neg':
        'silent: returned without an error',
    'LinearOperator:dtype-int':
        'silent: returned without an error',
    'lanczos:tol-neg':
        'silent: returned without an error (warnings: RuntimeWarning: lanczos: 2 Ritz pairs not converged a',
    'hutchinson_trace:batch_size-zero':
        "unclear: ValueError: 'range() arg 3 must not be zero' does not match ['`batch_size`|\\\\bbatch_size\\\\",
    'hutchinson_squared_frobenius:dim-mismatch':
        'silent: returned without an error',
    'lanczos:k=bool':
        'unclear: TypeError: "zeros(): argument \'size\' (position 1) must be tuple of ints, not bool" does no',
    'draw_probes:n=neg':
        "unclear: RuntimeError (expected ValueError/TypeError): 'Trying to create tensor with negative dimen",
    'draw_probes:n=float':
        "unclear: TypeError: 'randint() received an invalid combination of arguments - got (int, int, tuple,",
    'sigma_sweep:cache_path-directory':
        'unclear: IsADirectoryError: "[Errno 21] Is a directory: \'.\'" does not match [\'`cache_path`|\\\\bcache',
    'SweepResult:values-shape':
        'silent: returned without an error',
    'energy_layer_output:X-list':
        'unclear: TypeError: "unsupported operand type(s) for @: \'list\' and \'Tensor\'" does not match [\'`X`|\\',
    'energy_layer_output:X-int':
        "unclear: RuntimeError (expected ValueError/TypeError): 'expected m1 and m2 to have the same dtype, ",
    'energy_layer_output:X-nan':
        'silent: returned without an error',
    'energy_layer_output:X-float32':
        "unclear: RuntimeError (expected ValueError/TypeError): 'expected m1 and m2 to have the same dtype, ",
    'energy_layer_output:alpha=nan':
        'silent: returned without an error',
    'energy_layer_output:alpha=inf':
        'silent: returned without an error',
    'energy_layer_output:alpha=str':
        'unclear: TypeError: "unsupported operand type(s) for -: \'float\' and \'str\'" does not match [\'`alpha`',
    'energy_layer_loss:Y-shape':
        "unclear: RuntimeError (expected ValueError/TypeError): 'The size of tensor a (4) must match the siz",
    'energy_layer_jacobian:tied-M-not-square':
        'silent: returned without an error',
}
