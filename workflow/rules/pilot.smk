# Stage 2: pilot training on downsampled images with small networks, one independent job per latent
# dimension (the paper's zdim 1 and zdim 10 pilots), whose latents the filter reads.


rule train_pilot:
    input:
        table=TABLE,
        stack=get_stack(PILOT_D),
    output:
        **get_run_outputs(get_pilot_dir("{zdim}")),
        **get_convergence_outputs(
            "pilot", get_pilot_dir("{zdim}"), {"pilot": "zdim {zdim}"}
        ),
        curve=report(
            f"{get_pilot_dir('{zdim}')}/learning_curve.png",
            caption="../report/pilot_curve.rst",
            category="1. Pilot training",
            labels={"pilot": "zdim {zdim}", "figure": "learning curve"},
        ),
    log:
        get_log("pilot", "z{zdim}"),
    benchmark:
        get_benchmark("pilot", "z{zdim}")
    conda:
        "../../envs/gpu.yaml"
    threads: get_threads("pilot")
    resources:
        **get_resources("pilot"),
    params:
        run_dir=folder_of_output("model"),
        train_flags=get_train_flags("pilot"),
        version=DRGN_VERSION,
    shell:
        "drgn train {input.table} {input.stack} -o {params.run_dir} --auto-resume "
        "{params.train_flags} --threads {threads} > {log} 2>&1"
