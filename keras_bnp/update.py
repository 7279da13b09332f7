"""One BNP step's work on the gradients, given the step's blocks: the sums
of their inputs, each block's statistics update and preconditioning
(`layer_update`, a pure function of tensors), and the inner optimizer's
update, compiled together (`precondition_and_apply`)."""

import tensorflow as tf

from keras_bnp import preconditioner
from keras_bnp import statistics
from keras_bnp.state import variable_key


def precondition_and_apply(bnp, blocks, slots, step_inputs, grads,
                           trainable_variables, weights, regularized):
    """Updates the statistics of `blocks` (with their `slots`) from their
    records in `step_inputs`, preconditions their gradients in `grads`,
    and applies all of `grads` with `bnp`'s inner optimizer. `weights`:
    the step's sample weights (`statistics.position_weights`);
    `regularized`: whether the loss includes the layers' regularization
    penalties."""
    position = {variable_key(v): i for i, v in enumerate(trainable_variables)}
    indices = [[position.get(variable_key(v)) for v in block.variables]
               for block in blocks]
    features = [[block.features(record) for record in
                 step_inputs[block.layer]] for block in blocks]
    # The first update of a block (no running mean yet) centres its sums
    # on values of the batch, the same on every replica.
    first_sums = _all_replica_sums([
        statistics.shift_sums(x, axis, _mask(x), weights,
                              slot.moving_mean.dtype)
        for slot, ((x, axis), *_) in zip(slots, features)
    ])
    shifts, variances = [], []
    for slot, (total, count) in zip(slots, first_sums):
        running = tf.convert_to_tensor(slot.moving_count) > 0
        shifts.append(tf.where(running, tf.convert_to_tensor(
            slot.moving_mean), tf.math.divide_no_nan(total, count)))
        variances.append(tf.where(running, tf.convert_to_tensor(
            slot.moving_variance), float("nan")))
    # The input sums run as TensorFlow ops (on CPU, their multi-threaded
    # reductions beat XLA's) and are all-reduced across replicas.
    sums = _all_replica_sums([
        _input_sums(calls, shift, variance, weights)
        for calls, shift, variance in zip(features, shifts, variances)
    ])
    # The inner optimizer's update joins the compiled update below,
    # except under a tf.distribute strategy, whose cross-replica merge
    # cannot run inside it.
    distributed = tf.distribute.has_strategy()
    # Each parameter of the compiled call costs about 1 us on CPU, so
    # counts known when tracing go in as constants, and the running
    # means are read inside.
    sums = [(_static(count), *rest) for count, *rest in sums]

    # Keras' loss adds the layers' regularization penalties (divided by
    # the number of replicas, times the inner optimizer's
    # `loss_scale_factor`): their gradients go around the preconditioning,
    # so that a penalty's strength does not depend on the units of the
    # layer's inputs.
    penalized = sorted({
        i for block_indices in indices for i in block_indices
        if i is not None and grads[i] is not None and getattr(
            trainable_variables[i], "regularizer", None) is not None
    }) if regularized else []
    penalty_scale = (bnp.inner_optimizer.loss_scale_factor or 1.0) / (
        tf.distribute.get_strategy().num_replicas_in_sync)

    def update(sums, shifts, grads):
        grads = list(grads)  # tf.function forbids changing its argument
        penalties = {i: _penalty_gradient(trainable_variables[i])
                     * penalty_scale for i in penalized}
        for i, penalty in penalties.items():
            grads[i] = grads[i] - penalty
        skipped = []
        for block, slot, block_sums, shift, block_indices in zip(
                blocks, slots, sums, shifts, indices):
            # A Dense kernel's gradient for sparse inputs has no static
            # shape; XLA compiles `ensure_shape` away.
            block_grads = [
                None if i is None or grads[i] is None else
                tf.ensure_shape(grads[i], trainable_variables[i].shape)
                for i in block_indices]
            canonical = ((None, None) if block_grads[0] is None
                         else block.gather(block_grads))
            mean, variance, count, skips, *new_grads = layer_update(
                tf.convert_to_tensor(slot.moving_mean),
                tf.convert_to_tensor(slot.moving_variance),
                tf.convert_to_tensor(slot.moving_count),
                shift, *block_sums, *canonical,
                statistics_momentum=bnp.statistics_momentum,
                epsilon=bnp.epsilon, relative_epsilon=bnp.relative_epsilon,
                groups=block.groups, mean_scale=block.mean_scale,
            )
            bnp.assign(slot.moving_mean, mean)
            bnp.assign(slot.moving_variance, variance)
            bnp.assign(slot.moving_count, count)
            skipped.append(skips)
            if new_grads[0] is None:
                continue
            for index, grad in zip(block_indices,
                                   block.scatter(*new_grads, block_grads)):
                if index is not None and grad is not None:
                    grads[index] = grad
        for i, penalty in penalties.items():
            grads[i] = grads[i] + penalty
        bnp.assign_add(bnp._skipped_updates, tf.add_n(skipped))
        if distributed:
            return grads
        # Returning the gradients would make XLA write them out.
        bnp.inner_optimizer.apply(grads, trainable_variables)
        return None

    if not tf.executing_eagerly():
        # XLA fuses the step's BNP work (about 50 small ops per layer,
        # plus the inner update) into one compiled call, also when the
        # training step itself is not jit-compiled (the default on CPU).
        update = tf.function(update, jit_compile=True)
    preconditioned = update(sums, shifts, grads)
    if distributed:
        bnp.inner_optimizer.apply(preconditioned, trainable_variables)


def _mask(inputs):
    """The Keras mask of a layer's input (attached as `_keras_mask`)."""
    return getattr(inputs, "_keras_mask", None)


def _input_sums(calls, shift, variance, weights):
    """`(count, sum(x - shift), sum((x - shift)^2))` pooled over the
    `(x, channel_axis)` of all of a block's calls in this step, given its
    running variance (see `statistics.input_sums`), without the positions
    that a Keras mask on `x` leaves out, weighted by the step's sample
    weights."""
    per_call = [
        statistics.input_sums(x, axis, shift, variance, mask=_mask(x),
                              weights=weights)
        for x, axis in calls
    ]
    return [tf.add_n(list(parts)) for parts in zip(*per_call)]


def layer_update(
    moving_mean, moving_variance, moving_count, shift, count, centred_sum,
    centred_square_sum, grad_kernel, grad_bias, *, statistics_momentum,
    epsilon, relative_epsilon, groups, mean_scale=1.0,
):
    """One layer's statistics update and preconditioning, as a pure
    function of tensors (the sums are of the inputs minus `shift`).

    A batch with a non-finite value, whose squares overflow float32, or
    with no values leaves the statistics as they were. `skips` counts the
    first two causes, `[non-finite input, overflow]` (a batch without
    values has nothing to skip). `grad_kernel` may be `None` (the kernel
    is not trained this step). The gradients are centred on `mean_scale`
    times the mean (`rules.Block.mean_scale`), and damped as `epsilon` and
    `relative_epsilon` say (`BNP`'s arguments; `preconditioner.damping`).
    """
    mean, variance = statistics.moments_from_sums(
        count, centred_sum, centred_square_sum, shift
    )
    # `shift` is the running mean, except in the first update, where the
    # old mean has weight 0 and the shift keeps `mean - old mean` finite.
    new_mean, new_variance, new_count = statistics.update_moving(
        shift, moving_variance, moving_count, mean, variance, count,
        statistics_momentum
    )
    # A NaN or Inf input makes the sums non-finite. Otherwise the sums are
    # finite, unless the squares of finite values overflow float32 (values
    # apart by more than about sqrt(3e38 / count)).
    has_values = count > 0
    finite_input = tf.reduce_all(tf.math.is_finite(centred_sum))
    finite_squares = tf.reduce_all(tf.math.is_finite(centred_square_sum))
    usable = has_values & finite_input & finite_squares
    skips = tf.cast(tf.stack([has_values & ~finite_input,
                              has_values & finite_input & ~finite_squares]),
                    tf.float32)
    new_mean = tf.where(usable, new_mean, moving_mean)
    new_variance = tf.where(usable, new_variance, moving_variance)
    new_count = tf.where(usable, new_count, moving_count)
    if grad_kernel is not None:
        grad_kernel, grad_bias = preconditioner.precondition(
            grad_kernel, grad_bias, mean_scale * new_mean, new_variance,
            preconditioner.damping(new_mean, new_variance, epsilon,
                                   relative_epsilon), groups,
        )
    return new_mean, new_variance, new_count, skips, grad_kernel, grad_bias


def _penalty_gradient(variable):
    """The gradient of `variable`'s own regularization penalty."""
    value = tf.convert_to_tensor(variable)
    with tf.GradientTape() as tape:
        tape.watch(value)
        penalty = variable.regularizer(value)
    return tape.gradient(penalty, value)


def _static(count):
    """`count` as a Python float if it is known when tracing."""
    value = tf.get_static_value(count)
    return count if value is None else float(value)


def _all_replica_sums(sums):
    """Sums each layer's `(count, sum, sum of squares)` over the replicas of
    a tf.distribute strategy, in one all-reduce for all layers; unchanged
    without one. Summing counts weights replicas by their examples."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1 or not sums:
        return sums
    return context.all_reduce(tf.distribute.ReduceOp.SUM, sums)


