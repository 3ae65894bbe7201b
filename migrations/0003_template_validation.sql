-- A template's DAG is validated when it is stored: unique step names, only
-- known dependencies, no cycles. The API validates the same rules first to
-- give precise errors; this trigger is the guard that holds for every writer.
-- SQLSTATE TK002 marks an invalid template.

CREATE FUNCTION tasker.validate_template_definition(definition jsonb) RETURNS void
    LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    step       jsonb;
    dep        jsonb;
    names      text[] := '{}';
    step_name  text;
    remaining  integer;
    progressed boolean;
    done       text[] := '{}';
BEGIN
    IF jsonb_typeof(definition -> 'steps') IS DISTINCT FROM 'array'
       OR jsonb_array_length(definition -> 'steps') = 0 THEN
        RAISE EXCEPTION 'template definition needs a non-empty "steps" array' USING ERRCODE = 'TK002';
    END IF;

    FOR step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        step_name := step ->> 'name';
        IF step_name IS NULL OR NOT tasker.is_identifier(step_name) THEN
            RAISE EXCEPTION 'step name % is not an identifier', coalesce(step ->> 'name', 'null')
                USING ERRCODE = 'TK002';
        END IF;
        IF step_name = ANY (names) THEN
            RAISE EXCEPTION 'step name % is used twice', step_name USING ERRCODE = 'TK002';
        END IF;
        IF NOT coalesce(tasker.is_identifier(step ->> 'handler'), false) THEN
            RAISE EXCEPTION 'step % has an invalid handler name', step_name USING ERRCODE = 'TK002';
        END IF;
        IF jsonb_typeof(coalesce(step -> 'depends_on', '[]')) <> 'array' THEN
            RAISE EXCEPTION 'step %: depends_on must be an array', step_name USING ERRCODE = 'TK002';
        END IF;
        names := names || step_name;
    END LOOP;

    FOR step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        FOR dep IN SELECT * FROM jsonb_array_elements(coalesce(step -> 'depends_on', '[]')) LOOP
            IF NOT (dep #>> '{}') = ANY (names) THEN
                RAISE EXCEPTION 'step % depends on unknown step %', step ->> 'name', dep
                    USING ERRCODE = 'TK002';
            END IF;
        END LOOP;
    END LOOP;

    -- Kahn's algorithm: repeatedly mark steps whose dependencies are all marked.
    -- Whatever cannot be marked lies on (or behind) a cycle.
    LOOP
        progressed := false;
        FOR step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
            CONTINUE WHEN (step ->> 'name') = ANY (done);
            IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(coalesce(step -> 'depends_on', '[]')) d
                           WHERE NOT d = ANY (done)) THEN
                done := done || (step ->> 'name');
                progressed := true;
            END IF;
        END LOOP;
        EXIT WHEN NOT progressed;
    END LOOP;

    remaining := cardinality(names) - cardinality(done);
    IF remaining > 0 THEN
        RAISE EXCEPTION 'steps form a cycle: %',
            (SELECT string_agg(n, ', ' ORDER BY n) FROM unnest(names) n WHERE NOT n = ANY (done))
            USING ERRCODE = 'TK002';
    END IF;
END
$$;

CREATE FUNCTION tasker.check_template() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.definition IS DISTINCT FROM OLD.definition THEN
        RAISE EXCEPTION 'template %/% %: a published version is immutable; publish a new version',
            OLD.namespace, OLD.name, OLD.version USING ERRCODE = 'TK002';
    END IF;
    PERFORM tasker.validate_template_definition(NEW.definition);
    RETURN NEW;
END
$$;

CREATE TRIGGER task_templates_validate BEFORE INSERT OR UPDATE ON tasker.task_templates
    FOR EACH ROW EXECUTE FUNCTION tasker.check_template();
