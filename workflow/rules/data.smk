# Stage 1: the canonical particle table (simulated into results/simulated, a folder `drgn simulate` owns
# and replaces whole; or imported from RELION / cryoSPARC into results/data) and the Fourier-cropped
# stacks every later stage reads (results/data/particles.{D}.mrcs, one per box size, made once).

if SIMULATED:

    rule simulate_particles:
        output:
            table=IMPORTED,
            stack=f"{SIM_DIR}/particles.mrcs",
            star=f"{SIM_DIR}/particles.star",
            cs=f"{SIM_DIR}/particles.cs",
            gt=f"{SIM_DIR}/gt.json",
            gt_volumes=directory(f"{SIM_DIR}/gt_volumes"),
        log:
            get_log("simulate", "simulate"),
        benchmark:
            get_benchmark("simulate", "simulate")
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("simulate")
        resources:
            **get_resources("simulate"),
        params:
            outdir=folder_of_output("table"),
            simulation=config["simulate"],
            version=DRGN_VERSION,
        shell:
            "drgn simulate -o {params.outdir} --n {params.simulation[n]} -D {params.simulation[D]} "
            "--apix {params.simulation[apix]} --snr {params.simulation[snr]} "
            "--heterogeneity {params.simulation[heterogeneity]} --distribution {params.simulation[distribution]} "
            "--n-states {params.simulation[n_states]} --junk-fraction {params.simulation[junk_fraction]} "
            "--seed {params.simulation[seed]} --threads {threads} {params.simulation[extra]} > {log} 2>&1"

else:

    if EMPIAR:

        # On a cluster this runs on the submit host: compute nodes often have no internet access, and the
        # transfer needs no compute. `drgn fetch` resumes whatever an earlier run left and re-fetches
        # nothing complete, so rerunning this rule is cheap.
        localrules:
            fetch_empiar,

        rule fetch_empiar:
            output:
                **get_fetched_files(),
                done=touch(FETCH_DONE),
            log:
                get_log("fetch", "fetch"),
            benchmark:
                get_benchmark("fetch", "fetch")
            conda:
                "../../envs/cpu.yaml"
            params:
                commands=empiar_mode.fetch_shell(config),
                version=DRGN_VERSION,
            shell:
                "({params.commands}) > {log} 2>&1"

    rule import_particles:
        input:
            source=get_import_source,
            second=get_import_second_files,
            fetched=get_fetch_flag,
        output:
            table=IMPORTED,
        log:
            get_log("import", "import"),
        benchmark:
            get_benchmark("import", "import")
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("import")
        resources:
            **get_resources("import"),
        params:
            import_flags=get_import_options(),
            version=DRGN_VERSION,
        shell:
            "drgn import {input.source:q} -o {output.table} {params.import_flags} > {log} 2>&1"


rule downsample:
    input:
        table=IMPORTED,  # not TABLE: with input.poses abinit the pilot stack is ab initio's input
    output:
        stack=f"{R}/data/particles.{{D}}.mrcs",
        sidecar=f"{R}/data/particles.{{D}}.json",
    log:
        get_log("downsample", "D{D}"),
    benchmark:
        get_benchmark("downsample", "D{D}")
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("downsample")
    resources:
        **get_resources("downsample"),
    params:
        chunk_images=config["downsample"]["chunk"],
        float16_flag="--float16" if config["downsample"]["float16"] else "",
        version=DRGN_VERSION,
    shell:
        "drgn downsample {input.table} -D {wildcards.D} -o {output.stack} --chunk {params.chunk_images} "
        "{params.float16_flag} --max-threads {threads} > {log} 2>&1"
