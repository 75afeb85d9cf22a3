-- 181_usage_report_keys.sql: a usage report sent again is counted once.
--
-- An instance whose report got no answer (a connection lost after the commit, a 503)
-- cannot know whether it was counted: sent again, it was counted twice, and the
-- customer's daily messages ran out early. A report may now carry a key of the
-- instance's choosing (track-usage's Idempotency-Key header): the first report with a
-- key is counted (or refused) and its outcome kept; a report with a key the instance
-- used before is answered with that outcome and the counters as they are, and counts
-- nothing. The same key with another agent or tool is a mistake in the instance and
-- is refused ('key_reused'). Keys are the instance's own (another instance may use
-- the same), kept from their report to the end of the following day: an instance's
-- first report of a new day (its subscription's counter starts again) removes its
-- keys of the days before yesterday.
--
-- The subscription's row lock instance_track_usage already takes serializes an
-- instance's reports, so two reports with one key never both count.
--
-- Redefines public.instance_track_usage (070_tenant.sql) with the key as a fifth
-- argument, NULL by default: the binaries of before, calling it with four, keep
-- working. Its answer gains `replayed`; otherwise unchanged.

CREATE TABLE public.usage_report_keys (
    instance_id     uuid NOT NULL REFERENCES public.instances (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL CHECK (idempotency_key ~ '^[!-~]{1,255}$'),
    date            date NOT NULL,
    agent           text,
    tool            text,
    allowed         boolean NOT NULL,
    limit_kind      text CHECK (limit_kind IN ('messages', 'agents')),
    PRIMARY KEY (instance_id, idempotency_key)
);
ALTER TABLE public.usage_report_keys ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.usage_report_keys FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, INSERT, DELETE ON public.usage_report_keys TO service_role;
CREATE POLICY "Service role keeps usage report keys" ON public.usage_report_keys
    FOR ALL TO service_role USING (true) WITH CHECK (true);

DROP FUNCTION public.instance_track_usage(uuid, text, text, text);

CREATE FUNCTION public.instance_track_usage(p_instance_id uuid, p_key_id text,
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
    v_resets timestamptz := (CURRENT_DATE + 1)::timestamptz;
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

    -- The first report of a day: the keys of the days before yesterday go.
    IF v_reset IS NULL OR v_reset < CURRENT_DATE THEN
        DELETE FROM public.usage_report_keys k
         WHERE k.instance_id = p_instance_id AND k.date < CURRENT_DATE - 1;
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        SELECT * INTO v_seen FROM public.usage_report_keys k
         WHERE k.instance_id = p_instance_id AND k.idempotency_key = p_idempotency_key;
        IF FOUND AND (v_seen.agent IS DISTINCT FROM p_agent OR v_seen.tool IS DISTINCT FROM p_tool) THEN
            RETURN jsonb_build_object('outcome', 'key_reused');
        END IF;
    END IF;

    SELECT u.agents_used INTO v_agents FROM public.usage_metrics u
     WHERE u.instance_id = p_instance_id AND u.date = CURRENT_DATE;
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
        VALUES (p_instance_id, p_idempotency_key, CURRENT_DATE, p_agent, p_tool, v_allowed, v_limit);
    END IF;

    IF NOT v_allowed AND v_seen.instance_id IS NULL AND NOT EXISTS (
        SELECT 1 FROM public.audit_logs a
         WHERE a.account_id = v_account AND a.created_at >= CURRENT_DATE::timestamptz
           AND a.action = 'usage.limit_reached' AND a.actor_instance_id = p_instance_id
           AND a.details ->> 'limit' = v_limit) THEN
        INSERT INTO public.audit_logs (account_id, action, details, actor_role, actor_instance_id)
        VALUES (v_account, 'usage.limit_reached',
                jsonb_build_object('instance_id', p_instance_id, 'limit', v_limit,
                                   'date', CURRENT_DATE, 'agent', p_agent),
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
