-- 170_target_answering.sql: new instances are placed on targets that answer.
--
-- Placement chose among the enabled, undrained targets by free memory alone, so a
-- target that had stopped answering (its host down, its provisioner gone, a network
-- between) kept getting new customers, whose instances then waited there until an
-- operator drained or disabled it. Now the lifecycle worker records on the target
-- when one of its calls there got no answer at all (no connection, or no answer
-- before the call's deadline: a refusal or an error is an answer) and when a call
-- there is answered again, and placement prefers the targets that answer:
-- - provisioner_targets.unanswered_since: since when the worker's calls to the target
--   get no answer (the first unanswered call of the streak), NULL once a call is
--   answered (and for a target not called yet);
-- - public.target_answered(name, answered): the worker's record after a call, which
--   writes only when the state changes (true when it did). When the target answers
--   again, the steps of its instances that wait out a retry backoff are due at once
--   (their next attempt now, as an explicit request does): they failed while it was
--   away, and would otherwise wait up to MR_PROVISION_BACKOFF_CAP_S (an hour) each.
--   A step held for an operator (rejected) stays held;
-- - public.target_choose: among the candidates with room, those that answer first,
--   then by free memory as before. A target that does not answer still takes an
--   instance that fits nowhere else: the instance would wait either way, and there
--   it is made as soon as the target answers. An instance stays on its target for
--   life (its apps may have been made there before the call went unanswered), and
--   an instance re-created on kept storage still goes where the storage is;
-- - public.provisioner_target_json(target): the target as a step or a teardown
--   carries it ({"target", "url", "token_ref", "scheduler", "enabled",
--   "answering"}), in one place, so the worker records only a change.
--
-- Redefines (CREATE OR REPLACE keeps their grants), each unchanged but for the lines
-- named: public.target_choose (100_provisioner_targets.sql: the order),
-- public.lifecycle_target_of (100: the object) and public.instance_teardowns_due
-- (166_teardown_lease.sql: the object).

ALTER TABLE public.provisioner_targets ADD COLUMN unanswered_since timestamptz;

COMMENT ON COLUMN public.provisioner_targets.unanswered_since IS
    'Since when the lifecycle worker''s calls to this target get no answer (no '
    'connection, or their deadline passed); NULL once a call is answered. Placement '
    'prefers targets where it is NULL (public.target_choose).';

-- The worker's record of a call to target p_name: p_answered false when it got no
-- answer at all. Writes only a change of state; true when it wrote one. Answering
-- again, its instances' steps backing off are due now (they wake the workers).
CREATE FUNCTION public.target_answered(p_name text, p_answered boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_id bigint;
BEGIN
    UPDATE public.provisioner_targets
       SET unanswered_since = CASE WHEN p_answered THEN NULL ELSE now() END
     WHERE name = p_name AND (unanswered_since IS NULL) <> p_answered
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RETURN false;
    END IF;
    IF p_answered THEN
        UPDATE public.instances SET next_attempt_at = now()
         WHERE target_id = v_id AND owed_action <> 'email' AND next_attempt_at > now();
    END IF;
    RETURN true;
END;
$$;

-- A target as the worker is handed it with a step or a teardown.
CREATE FUNCTION public.provisioner_target_json(p public.provisioner_targets)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT jsonb_build_object('target', p.name, 'url', p.url, 'token_ref', p.token_ref,
                              'scheduler', p.scheduler, 'enabled', p.enabled,
                              'answering', p.unanswered_since IS NULL);
$$;

CREATE OR REPLACE FUNCTION public.target_choose(p_reserve_mb integer)
RETURNS bigint
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    WITH candidates AS (
        SELECT t.id, t.pinned, public.target_free_mb(t.id) - p_reserve_mb AS left_mb,
               t.unanswered_since IS NULL AS answering
          FROM public.provisioner_targets t
         WHERE t.enabled AND NOT t.drained)
    SELECT c.id FROM candidates c
     WHERE c.left_mb >= 0
       AND (c.pinned OR NOT EXISTS (SELECT 1 FROM candidates p WHERE p.pinned))
     ORDER BY c.answering DESC, c.left_mb DESC, c.id
     LIMIT 1;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_target_of(p_instance_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT public.provisioner_target_json(t)
      FROM public.instances x JOIN public.provisioner_targets t ON t.id = x.target_id
     WHERE x.id = p_instance_id;
$$;

CREATE OR REPLACE FUNCTION public.instance_teardowns_due(p_limit integer)
RETURNS TABLE (instance_id uuid, dokku_app_name text, attempts integer, target jsonb)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT t.instance_id, t.dokku_app_name, t.attempts,
           CASE WHEN p.id IS NOT NULL THEN public.provisioner_target_json(p) END
      FROM public.instance_teardowns t
      LEFT JOIN public.provisioner_targets p ON p.id = t.target_id
     WHERE t.done_at IS NULL AND t.not_before <= now()
       AND (t.claimed_until IS NULL OR t.claimed_until <= now())
       AND (t.target_id IS NULL OR p.enabled)
     ORDER BY t.not_before, t.instance_id
     LIMIT greatest(p_limit, 0)
$$;

REVOKE ALL ON FUNCTION public.target_answered(text, boolean),
    public.provisioner_target_json(public.provisioner_targets)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.target_answered(text, boolean),
    public.provisioner_target_json(public.provisioner_targets)
    TO service_role;
