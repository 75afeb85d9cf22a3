-- 204_refused_report_judged_again.sql: a usage report refused at a limit and sent
-- again with its Idempotency-Key is judged again, not refused again for good.
--
-- instance_track_usage (181, last 182) answers a report whose key the instance used
-- before as that first report was, counting nothing: right for a report that was
-- counted (sent again after a lost answer, it must not count twice), wrong for one
-- that was refused. A refusal counted nothing, and its 429 says when to try again
-- (Retry-After: the next UTC midnight), yet the same message sent again with its key
-- got the same refusal back: after the customer's upgrade the same day (429 with
-- "remaining" in the thousands), and the next day too (its key is kept until the end
-- of the day after its report), so the message got through only two days later. A
-- report whose key holds a refusal is now judged as a new one, and its key records the
-- new outcome; a report whose key holds a counted one is answered as before.
--
-- Redefines public.instance_track_usage (182_usage_day_of_the_counter.sql) whole and
-- unchanged but for that block. CREATE OR REPLACE keeps its grants.

CREATE OR REPLACE FUNCTION public.instance_track_usage(p_instance_id uuid, p_key_id text,
                                            p_agent text, p_tool text,
                                            p_idempotency_key text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_account uuid;
    v_max_agents integer;
    v_reset date;
    v_max_messages integer;
    v_count integer;
    v_agents jsonb;
    v_agents_today integer;
    v_allowed boolean;
    v_remaining integer;
    v_limit text;
    v_seen public.usage_report_keys;
    v_counted boolean := false;
    v_today date;
    v_resets timestamptz;
BEGIN
    PERFORM 1 FROM public.instance_tokens t
     WHERE t.instance_id = p_instance_id AND t.key_id = p_key_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'revoked');
    END IF;
    -- The subscription row serializes an instance's reports (track_usage locks it
    -- too): the distinct-agent check, the key and the count cannot race.
    SELECT s.account_id, s.max_agents, s.last_reset_at, s.max_messages_per_day,
           s.current_messages_today
      INTO v_account, v_max_agents, v_reset, v_max_messages, v_count
      FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id
     WHERE i.id = p_instance_id
       FOR UPDATE OF s;
    -- The day this report counts in: the counter's, when it already moved past
    -- this transaction's CURRENT_DATE (track_usage counts it there too).
    v_today := greatest(v_reset, CURRENT_DATE);
    v_resets := (v_today + 1)::timestamptz;

    -- The first report of a day: the keys of the days before yesterday go.
    IF v_reset IS NULL OR v_reset < CURRENT_DATE THEN
        DELETE FROM public.usage_report_keys k
         WHERE k.instance_id = p_instance_id AND k.date < v_today - 1;
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_seen FROM public.usage_report_keys k
         WHERE k.instance_id = p_instance_id AND k.idempotency_key = p_idempotency_key;
        IF FOUND AND (v_seen.agent IS DISTINCT FROM p_agent OR v_seen.tool IS DISTINCT FROM p_tool) THEN
            RETURN jsonb_build_object('outcome', 'key_reused');
        END IF;
        -- A refusal counted nothing: sent again, the report is judged again (its key
        -- then records the new outcome).
        IF FOUND AND NOT v_seen.allowed THEN
            DELETE FROM public.usage_report_keys k
             WHERE k.instance_id = p_instance_id AND k.idempotency_key = p_idempotency_key;
            v_seen := NULL;
        END IF;
    END IF;

    SELECT u.agents_used INTO v_agents FROM public.usage_metrics u
     WHERE u.instance_id = p_instance_id AND u.date = v_today;
    v_agents := CASE WHEN jsonb_typeof(v_agents) = 'object' THEN v_agents ELSE '{}'::jsonb END;
    SELECT count(*)::integer INTO v_agents_today FROM jsonb_object_keys(v_agents);

    IF v_seen.instance_id IS NOT NULL THEN
        -- Sent again: its first outcome, the counters as they are, nothing counted.
        v_allowed := v_seen.allowed;
        v_limit := v_seen.limit_kind;
    ELSIF p_agent IS NOT NULL AND NOT v_agents ? p_agent AND v_agents_today >= v_max_agents THEN
        v_allowed := false;
        v_limit := 'agents';
    ELSE
        SELECT t.allowed, t.remaining INTO v_allowed, v_remaining
          FROM public.track_usage(p_instance_id, p_agent, p_tool) t;
        v_counted := true;
        IF NOT v_allowed THEN
            v_limit := 'messages';
        ELSIF p_agent IS NOT NULL AND NOT v_agents ? p_agent THEN
            v_agents_today := v_agents_today + 1;
        END IF;
    END IF;
    IF NOT v_counted THEN
        -- What is left today, from the row read (and locked) above.
        v_remaining := CASE WHEN v_max_messages IS NULL THEN NULL
                            ELSE greatest(v_max_messages -
                                 CASE WHEN v_reset < CURRENT_DATE THEN 0
                                      ELSE coalesce(v_count, 0) END, 0) END;
    END IF;

    IF p_idempotency_key IS NOT NULL AND v_seen.instance_id IS NULL THEN
        INSERT INTO public.usage_report_keys (instance_id, idempotency_key, date, agent, tool,
                                              allowed, limit_kind)
        VALUES (p_instance_id, p_idempotency_key, v_today, p_agent, p_tool, v_allowed, v_limit);
    END IF;

    IF NOT v_allowed AND v_seen.instance_id IS NULL AND NOT EXISTS (
        SELECT 1 FROM public.audit_logs a
         WHERE a.account_id = v_account AND a.created_at >= v_today::timestamptz
           AND a.action = 'usage.limit_reached' AND a.actor_instance_id = p_instance_id
           AND a.details ->> 'limit' = v_limit) THEN
        INSERT INTO public.audit_logs (account_id, action, details, actor_role, actor_instance_id)
        VALUES (v_account, 'usage.limit_reached',
                jsonb_build_object('instance_id', p_instance_id, 'limit', v_limit,
                                   'date', v_today, 'agent', p_agent),
                'instance', p_instance_id);
    END IF;

    RETURN jsonb_build_object(
        'outcome', 'ok', 'replayed', v_seen.instance_id IS NOT NULL,
        'allowed', v_allowed, 'remaining', v_remaining, 'resets_at', v_resets,
        'retry_after_s', greatest(1, ceil(extract(epoch FROM v_resets - now())))::bigint,
        'limit', v_limit, 'max_agents', v_max_agents, 'agents_today', v_agents_today);
END;
$$;
