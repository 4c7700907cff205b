# Stage 4: the final model, trained on the particles the filter kept (their canonical rows, --ind), at a
# larger box and with larger networks, holding out a random fraction for the validation loss.
# highres.processes > 1 trains data-parallel on one node (`drgn train --nproc P`: torchrun, one process per
# GPU); highres.nodes > 1 asks SLURM for N nodes with G GPUs each and starts one `drgn train --nproc P
# --nnodes N` per node with srun (the rendezvous is the job's first node).


rule train_highres:
    input:
        table=TABLE,
        stack=get_stack(HIGH_D),
        kept=f"{FILTER}/kept.npy",
    output:
        **get_run_outputs(HIGHRES),
        **get_convergence_outputs("highres", HIGHRES, {}),
        curve=report(
            f"{HIGHRES}/learning_curve.png",
            caption="../report/highres_curve.rst",
            category="3. High-resolution training",
            labels={"figure": "learning curve"},
        ),
    log:
        get_log("highres", "train"),
    benchmark:
        get_benchmark("highres", "train")
    conda:
        "../../envs/gpu.yaml"
    threads: get_threads("highres")
    resources:
        **highres_resources(),
    params:
        run_dir=folder_of_output("model"),
        train_flags=get_train_flags("highres"),
        launcher=highres_launch(),
        process_flags=lambda wildcards, threads: highres_process_flags(threads),
        version=DRGN_VERSION,
    shell:
        "{params.launcher}drgn train {input.table} {input.stack} -o {params.run_dir} --auto-resume "
        "--ind {input.kept} {params.train_flags} {params.process_flags} > {log} 2>&1"
