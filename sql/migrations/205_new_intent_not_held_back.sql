-- 205_new_intent_not_held_back.sql: a stop, a destroy or a start that billing asks
-- for is due at once, not after another step's retry backoff.
--
-- public.instance_request (040) records what an instance is asked to become (the
-- webhook's intent: an unpaid or paused subscription's stop, a cancellation's
-- destroy, a renewal's start). The owed action's due time is the latest of when it
-- became owed and next_attempt_at (instances_work_owed), whichever step that backoff
-- was for. So after a step that kept failing (an update whose deploy answered 502, at
-- MR_PROVISION_BACKOFF_CAP_S, an hour; a health redeploy's backoff), the customer who
-- stopped paying kept a running MindRoom, and the one who cancelled kept it, until
-- that backoff ran out; and one who paid again waited as long for its start.
-- lifecycle_deprovision (an operator's request) already lifted a backoff on the stop
-- or destroy it asked for; billing's did not. Now a change of the desired status
-- lifts a backoff still running: the new action is tried at once, and backs off on
-- its own failures. A rejected step's hold is the rejected action's alone and holds
-- nothing else already (docs/lifecycle.md, "When work is due").
--
-- Redefines public.instance_request (040_owed_work.sql), unchanged but for
-- next_attempt_at in its UPDATE. CREATE OR REPLACE keeps its grants.

CREATE OR REPLACE FUNCTION public.instance_request(p_id uuid, p_desired public.instance_status)
RETURNS public.instances
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    i public.instances;
BEGIN
    UPDATE public.instances SET desired_status = p_desired,
           next_attempt_at = CASE WHEN next_attempt_at > now() THEN now() ELSE next_attempt_at END
     WHERE id = p_id AND desired_status <> p_desired AND desired_status <> 'deprovisioned'
       AND status NOT IN ('deprovisioning', 'deprovisioned')
    RETURNING * INTO i;
    IF NOT FOUND THEN
        SELECT * INTO i FROM public.instances WHERE id = p_id;
    END IF;
    RETURN i;
END;
$$;
