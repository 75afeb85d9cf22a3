-- 182_usage_day_of_the_counter.sql: a report counts, and is recorded, in one day.
--
-- track_usage counts a report against the day the subscription's counter is at
-- when that day is later than the transaction's CURRENT_DATE (a report that began
-- just before midnight and took the subscription's lock after one of the new day:
-- 120_usage_day_forward.sql), but wrote its usage_metrics row, and
-- instance_track_usage read the day's distinct agents and dated its idempotency key
-- and its limit audit row, under CURRENT_DATE: the old day. Such a report counted a
-- message of the new day in the old day's row, and its agent was not among the new
-- day's (a plan's max_agents could be passed by one). Each now uses one day: the
-- later of the counter's and CURRENT_DATE.
--
-- Redefines public.track_usage (120_usage_day_forward.sql) and
-- public.instance_track_usage (181_usage_report_keys.sql): unchanged but for those
-- lines.

CREATE OR REPLACE FUNCTION public.track_usage(
    p_instance_id uuid,
    p_agent_name  text DEFAULT NULL,
    p_tool_name   text DEFAULT NULL
) RETURNS TABLE (allowed boolean, remaining integer)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_sub   uuid;
    v_count integer;
    v_max   integer;
    v_reset date;
BEGIN
    SELECT i.subscription_id INTO v_sub FROM public.instances i WHERE i.id = p_instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown instance %', p_instance_id USING ERRCODE = 'P0002';
    END IF;

    SELECT s.current_messages_today, s.max_messages_per_day, s.last_reset_at
      INTO v_count, v_max, v_reset
      FROM public.subscriptions s WHERE s.id = v_sub
      FOR UPDATE;
    -- A day the counter already moved to is never taken back: a call whose
    -- CURRENT_DATE is older (its transaction began before midnight, or its session
    -- is in a zone behind) counts against that later day.
    IF v_reset IS NULL OR v_reset < CURRENT_DATE THEN
        v_count := 0;
    END IF;
    v_reset := greatest(v_reset, CURRENT_DATE);
    v_count := coalesce(v_count, 0);

    IF v_max IS NOT NULL AND v_count >= v_max THEN
        UPDATE public.subscriptions
           SET current_messages_today = v_count, last_reset_at = v_reset
         WHERE id = v_sub AND (current_messages_today IS DISTINCT FROM v_count
                               OR last_reset_at IS DISTINCT FROM v_reset);
        allowed := false; remaining := 0;
        RETURN NEXT;
        RETURN;
    END IF;

    v_count := v_count + 1;
    UPDATE public.subscriptions
       SET current_messages_today = v_count, last_reset_at = v_reset
     WHERE id = v_sub;

    INSERT INTO public.usage_metrics AS u (instance_id, date, messages_sent, agents_used, tools_used)
    VALUES (p_instance_id, v_reset, 1,
            CASE WHEN p_agent_name IS NOT NULL
                 THEN jsonb_build_object(p_agent_name, 1) ELSE '{}'::jsonb END,
            CASE WHEN p_tool_name IS NOT NULL
                 THEN jsonb_build_object(p_tool_name, 1) ELSE '{}'::jsonb END)
    ON CONFLICT (instance_id, date) DO UPDATE
    SET messages_sent = coalesce(u.messages_sent, 0) + 1,
        agents_used = CASE WHEN p_agent_name IS NOT NULL
                           THEN coalesce(u.agents_used, '{}'::jsonb) || jsonb_build_object(p_agent_name,
                                coalesce((u.agents_used ->> p_agent_name)::int, 0) + 1)
                           ELSE u.agents_used END,
        tools_used = CASE WHEN p_tool_name IS NOT NULL
                          THEN coalesce(u.tools_used, '{}'::jsonb) || jsonb_build_object(p_tool_name,
                               coalesce((u.tools_used ->> p_tool_name)::int, 0) + 1)
                          ELSE u.tools_used END;

    allowed := true;
    remaining := CASE WHEN v_max IS NULL THEN NULL ELSE v_max - v_count END;
    RETURN NEXT;
END;
$$;

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

REVOKE ALL ON FUNCTION public.instance_track_usage(uuid, text, text, text, text)
    FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.instance_track_usage(uuid, text, text, text, text) TO service_role;
