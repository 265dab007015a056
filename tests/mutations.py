"""The catalogue of tests/mutation_check.py: each mechanism a documented guarantee rests on, the
exact code that implements it, that code with the mechanism removed, and the tests that must fail.

Randomness: every step reseeds torch, Python and NumPy from (seed, rank, step) (training/rng.py),
so the generator states a checkpoint also stores are not what exact resume rests on (a SIGTERM
checkpoint holds rank 0's alone); the reseeds are the mechanism removed here.
"""

from mutation_check import Mutation

RESUME_MIDRUN = "tests/distributed/test_resume_midrun.py"
MECHANISMS = "tests/distributed/test_mechanisms.py"

ITERABLE = "tests/distributed/test_iterable.py"
DATA_WORKERS = "tests/distributed/test_data_workers.py"

MUTATIONS = [
    Mutation(
        "a reduction read on the host is checked: every rank counts itself in it (an aborted NCCL group's "
        "garbage is a communication failure, not the job's numbers)",
        "distributed_train/distributed/group.py",
        "    if counted != world_size:\n",
        "    if False:\n",
        ("tests/distributed/test_nonfinite_and_hangs.py::test_a_reduction_read_after_the_group_was_aborted_is_a_"
         "communication_failure",)),
    Mutation(
        "the stop vote is checked the same way: every rank counts itself in it (an aborted group's "
        "buffer is a communication failure, not a stop nobody asked for or a missed one)",
        "distributed_train/distributed/preemption.py",
        "        if counted != self.world_size:\n",
        "        if False:\n",
        ("tests/distributed/test_nonfinite_and_hangs.py::test_a_stop_vote_after_the_group_was_aborted_is_a_"
         "communication_failure",)),
    Mutation(
        "the object collectives are checked too: a payload of another call (an aborted group's "
        "leftover buffer) is a communication failure, not a stale rng state in a checkpoint",
        "distributed_train/distributed/group.py",
        "    if stamp != call:\n",
        "    if False:\n",
        ("tests/distributed/test_object_collectives.py::test_a_save_whose_rng_gather_came_back_stale_commits_"
         "nothing_and_exits_4",)),
    Mutation(
        "a job whose bucket lock another job took over stops before its next checkpoint",
        "distributed_train/training/mirror.py",
        "        if self.lock_lost:\n            raise UsageError(",
        "        if False:\n            raise UsageError(",
        ("tests/e2e/test_object_storage_runs.py::test_metrics_go_up_in_batches_and_a_job_whose_lock_was_taken_over_"
         "stops_and_commits_nothing_more",)),
    Mutation(
        "a run directory in a bucket: the metrics are uploaded right after each checkpoint",
        "distributed_train/training/checkpoints/checkpointer.py",
        "            self.mirror.upload_metrics_soon()",
        "            pass",
        ("tests/e2e/test_object_storage_runs.py::test_the_bucket_metrics_reach_each_checkpoint_before_the_next_"
         "batch_so_a_lost_node_loses_no_resume_point",)),
    Mutation(
        "goodput: an attempt's work after the point the next attempt resumed from counted as lost",
        "distributed_train/training/reporting/goodput.py",
        "        kept = [e for e in attempt if resumed_next is None or e[\"step\"] <= resumed_next]\n",
        "        kept = list(attempt)\n",
        ("tests/unit/test_goodput.py",)),
    Mutation(
        "a checkpoint in a bucket committed by a record created only if none exists (one writer wins)",
        "distributed_train/training/checkpoints/remote.py",
        "    if not store.put_bytes(f\"{PREFIX}/{folder}/{commit.MARKER}\", record, create=True):\n",
        "    if not store.put_bytes(f\"{PREFIX}/{folder}/{commit.MARKER}\", record, create=False):\n",
        ("tests/e2e/test_object_storage.py::test_a_commit_record_is_created_once",)),
    Mutation(
        "a bucket's rotation never deletes a checkpoint newer than the one just committed",
        "distributed_train/training/checkpoints/remote.py",
        "    older = [remote for remote in found if remote.step <= kept_step]\n",
        "    older = list(found)\n",
        ("tests/e2e/test_object_storage.py::test_rotation_deletes_older_committed_and_unfinished_saves_never_a_"
         "newer_one",)),
    Mutation(
        "a stop signal task code sends its own process refused (a task failure, not a stop)",
        "distributed_train/errors.py", "    _refusing = refuse\n", "    _refusing = False\n",
        ("tests/unit/test_preemption.py::test_a_stop_signal_this_process_sends_itself_is_refused_where_it_is_sent_"
         "and_others_pass",)),
    Mutation(
        "a stream's global batch split by rank (rank r takes every W-th sample)",
        "distributed_train/training/iterable.py",
        "            share = chunk[self.rank::W]\n", "            share = chunk[:B // W]\n",
        (ITERABLE + "::test_two_and_three_ranks_and_workers_train_the_same_model_as_one_process",)),
    Mutation(
        "a stream's saved state loaded in its own pass (set_epoch first)", "distributed_train/training/iterable.py",
        "        if callable(getattr(self.dataset, \"set_epoch\", None)):\n",
        "        if self._resume_state is None and callable(getattr(self.dataset, \"set_epoch\", None)):\n",
        (ITERABLE + "::test_a_hugging_face_streaming_dataset_trains_alike_on_any_world_size_and_resumes_from_"
         "its_state",)),
    Mutation(
        "a parameter without a gradient looked for after every backward, not only the first",
        "distributed_train/engines/ddp.py",
        "        if any(p.grad is None for p in self._trainable):\n",
        "        if not self.stepped and any(p.grad is None for p in self._trainable):\n",
        ("tests/e2e/test_bad_input_matrix.py::test_a_parameter_unused_on_one_rank_at_a_later_step_is_named_at_once",)),
    Mutation(
        "LR scheduler restore on resume", "distributed_train/engines/base.py",
        '        self.scheduler.load_state_dict(state["scheduler"])\n', "        pass\n",
        (RESUME_MIDRUN,)),
    Mutation(
        "optimizer state restore on resume", "distributed_train/training/checkpoints/shards.py",
        "    safe_load.load(state, path)\n",
        '    safe_load.load({"model": state["model"]}, path)\n',
        (RESUME_MIDRUN,)),
    Mutation(
        "per-step reseed of torch's generator", "distributed_train/training/rng.py",
        "    torch.default_generator.manual_seed(value)\n", "",
        (RESUME_MIDRUN,)),
    Mutation(
        "per-step reseed of Python's and NumPy's generators", "distributed_train/training/rng.py",
        "    random.seed(value)\n    np.random.seed(value % 2**32)\n", "",
        (RESUME_MIDRUN,)),
    Mutation(
        "a new permutation every epoch", "distributed_train/training/data.py",
        "manual_seed(seed * 100_003 + epoch)", "manual_seed(seed * 100_003)",
        ("tests/unit/test_data.py::test_permutation_depends_only_on_seed_and_epoch",)),
    Mutation(
        "a new permutation every epoch, for datasets too big for randperm", "distributed_train/training/data.py",
        "FeistelPermutation(n, seed * 100_003 + epoch)", "FeistelPermutation(n, seed * 100_003)",
        ("tests/unit/test_data.py::test_permutation_depends_only_on_seed_and_epoch",)),
    Mutation(
        "the sampler positioned at the current epoch and step (set_epoch)", "distributed_train/training/stream.py",
        "self.sampler.set_position(self.epoch, self.step_in_epoch)", "self.sampler.set_position(self.epoch, 0)",
        (RESUME_MIDRUN,)),
    Mutation(
        "rank 0's buffers broadcast before evaluation", "distributed_train/engines/base.py",
        "            for buffer in self.raw_model.buffers():\n                torch_dist.broadcast(buffer, src=0)\n",
        "            pass\n",
        ("tests/distributed/test_equivalence.py::test_batchnorm_model_trains_and_keeps_buffers_in_sync",)),
    Mutation(
        "no all-reduce (no_sync) on non-final micro-steps", "distributed_train/engines/ddp.py",
        "        return self._unused_named(self.model.no_sync() if not last else contextlib.nullcontext())\n",
        "        return self._unused_named(contextlib.nullcontext())\n",
        (MECHANISMS,)),
    Mutation(
        "unpadded eval shards (no sample counted twice)", "distributed_train/training/data.py",
        "    return range(rank * dataset_len // world_size, (rank + 1) * dataset_len // world_size)",
        "    return range(rank * dataset_len // world_size,"
        " min(dataset_len, (rank + 1) * dataset_len // world_size + 1))",
        ("tests/unit/test_data.py", "tests/distributed/test_eval_exact.py")),
    Mutation(
        "sharded eval in lockstep (a rank with a batch fewer runs a discarded forward)",
        "distributed_train/training/evaluation.py",
        "            if engine.eval_in_lockstep:", "            if False:",
        ("tests/distributed/test_fsdp.py::test_ranks_with_fewer_eval_batches_keep_in_step_and_the_metrics_stay_exact",)),
    Mutation(
        "each rank stages only its share of the replicated state (not a whole copy per rank)",
        "distributed_train/training/checkpoints/staging.py",
        "    if world_size <= 1:\n        return state\n",
        "    if True:\n        return state\n",
        ("tests/distributed/test_checkpoint_staging.py::test_each_rank_stages_its_share_and_nothing_is_read_back",)),
    Mutation(
        "commit-record verification on load", "distributed_train/training/checkpoints/commit.py",
        '    marker = commit_record(path, check_name=False)\n    if marker is None:\n',
        '    marker = commit_record(path, check_name=False)\n    return None\n    if marker is None:\n',
        ("tests/unit/test_checkpoint.py",)),
    Mutation(
        "rotation only after the new checkpoint is committed", "distributed_train/training/checkpoints/shards.py",
        "            commit.commit_directory(self.directory, step, lambda: write_train_state(tmp, train_state),\n"
        "                                    fresh=False, known=known)\n            self.rotate(step)\n",
        "            self.rotate(step)\n"
        "            commit.commit_directory(self.directory, step, lambda: write_train_state(tmp, train_state),\n"
        "                                    fresh=False, known=known)\n",
        ("tests/unit/test_checkpoint.py::test_sharded_writer_rotates_only_after_the_new_checkpoint_is_committed",)),
    Mutation(
        "rotation never deletes the kept checkpoint or a newer one", "distributed_train/training/checkpoints/commit.py",
        "if step <= kept_step]", "]",
        ("tests/unit/test_checkpoint.py",)),
    Mutation(
        "the agreed stop step (every rank stops after the same step)", "distributed_train/distributed/preemption.py",
        "        if not _group_active():\n            self.agreed_signum = self.signum\n",
        "        if True:  # each rank on its own signal\n            self.agreed_signum = self.signum\n",
        ("tests/distributed/test_stop_agreement.py",)),
    Mutation(
        "rank 0's run_dir given to every rank", "distributed_train/training/run.py",
        "config.run_dir = gathered[0][0]",
        "config.run_dir = config.run_dir or default_run_dir(config.task)",
        (MECHANISMS,)),
    Mutation(
        "DataLoader workers start from a forkserver, not as forks of a rank whose threads may hold locks",
        "distributed_train/config.py",
        '        "forkserver", "how DataLoader workers start:',
        '        "fork", "how DataLoader workers start:',
        (f"{DATA_WORKERS}::test_default_workers_do_not_inherit_locks_held_by_the_ranks_threads",)),
    Mutation(
        "a TMPDIR too long for the forkserver's socket is replaced by a short folder",
        "distributed_train/training/workers.py",
        "    _room_for_the_forkserver_socket()\n    multiprocessing.forkserver.ensure_running()\n",
        "    multiprocessing.forkserver.ensure_running()\n",
        (f"{DATA_WORKERS}::test_workers_start_under_a_tmpdir_too_long_for_the_forkserver_socket",)),
    Mutation(
        "each forkserver-started worker closes its copy of the forkserver's lifeline (both end with the rank)",
        "distributed_train/training/workers.py",
        '    return {"multiprocessing_context": context, "worker_init_fn": leave_the_forkserver_to_the_rank}\n',
        '    return {"multiprocessing_context": context}\n',
        (f"{DATA_WORKERS}::test_workers_end_when_their_rank_is_killed",)),
    Mutation(
        "a rank that leaves without interpreter exit still unlinks its queues' semaphores and removes its "
        "pymp-* folder (no resource-tracker warning under the run's last line, nothing left in TMPDIR)",
        "distributed_train/cli/train.py",
        "    release_multiprocessing()\n    logging.shutdown()\n",
        "    logging.shutdown()\n",
        ("tests/e2e/test_task_layouts.py::test_both_layouts_train_under_every_launcher",)),
    Mutation(
        "a leaving rank lets closed queues' feeder threads finish their semaphores' unlink and unregister "
        "(no resource-tracker warning of a leaked semaphore that no longer exists)",
        "distributed_train/training/workers.py",
        "            thread.join(timeout=max(0.0, deadline - time.monotonic()))\n",
        "            pass\n",
        ("tests/unit/test_workers.py::test_a_rank_leaving_lets_closed_queues_feeder_threads_finish_their_semaphores",)),
    Mutation(
        "a worker death torch reports from its SIGCHLD handler, wherever the rank is (workers started by "
        "fork or spawn), is one line naming the worker and its signal, not a traceback",
        "distributed_train/training/run.py",
        "timeout_s), \\\n                worker_deaths_explained():\n",
        "timeout_s):\n",
        ("tests/e2e/test_fault_matrix.py::test_a_dataloader_worker_killed_mid_run_is_named_with_its_signal[fork]",)),
    Mutation(
        "a write the disk refused inside DCP (any rank's shard) or torch.save is the OSError it was: one "
        "line with the OS's reason and nothing of the checkpoint kept, not DCP's tracebacks or a .tmp-* folder",
        "distributed_train/files.py",
        "        raise OSError(*found.args) from exc\n",
        "        raise\n",
        ("tests/e2e/test_fault_matrix.py::test_a_disk_that_refuses_every_ranks_shard_is_one_line_and_keeps_nothing_"
         "of_the_checkpoint",
         "tests/unit/test_checkpoint.py::test_a_train_state_the_disk_cut_short_is_the_os_error_not_torchs_"
         "unexpected_pos")),
    Mutation(
        "a rank explaining its failure asks the store's server whether it is there before reading the "
        "peers' heartbeats (no c10d warnings with C++ stack traces under its one line)",
        "distributed_train/distributed/diagnose.py",
        "    if store is None or not _store_answers(store):\n",
        "    if store is None:\n",
        ("tests/unit/test_fault_reporting.py::test_a_rank_that_fails_after_the_stores_host_left_asks_it_nothing",)),
    Mutation(
        "dtrain launch gives its workers one string-hash seed: a task's list(set(text)) vocabulary is the "
        "same on every rank",
        "distributed_train/cli/launch.py",
        "    for key, value in {**RESTART_SAFE_ENV, **SAME_HASHES_ENV}.items():\n",
        "    for key, value in RESTART_SAFE_ENV.items():\n",
        ("tests/e2e/test_launch.py::test_every_rank_builds_the_same_data_from_a_set_of_strings",)),
    Mutation(
        "every rank builds datasets of one length: a rank with a partial copy of the data is refused at "
        "start, not trained on other samples until it hangs at its epoch's end",
        "distributed_train/training/data.py",
        "        if others:\n",
        "        if False:\n",
        ("tests/e2e/test_bad_input_matrix.py::test_a_rank_with_a_partial_copy_of_the_data_stops_every_rank_before_"
         "the_first_step",)),
    Mutation(
        "fsdp starts every rank from rank 0's model, as DDP does: a model() that reads its weights on "
        "rank 0 only is not trained as a mix of the ranks' copies",
        "distributed_train/engines/fsdp.py",
        "        start_from_rank_zero(model)\n",
        "",
        ("tests/distributed/test_fsdp.py::test_every_rank_starts_from_rank_0s_model",)),
    Mutation(
        "a (sum, count) loss is divided by the count over every rank and micro-batch: padded token "
        "batches train as one process's token mean on any split",
        "distributed_train/engines/base.py",
        "        factor = self.env.world_size / count.clamp_min(1)\n",
        "        factor = 1 / count.clamp_min(1)\n",
        ("tests/distributed/test_third_party_shapes.py::test_a_loss_summed_over_tokens_with_its_count_is_one_"
         "processs_mean_on_any_split",)),
]
