-- 183_checkout_incomplete_subscription.sql: a subscription whose first payment is
-- still processing refuses a second checkout.
--
-- Stripe keeps a subscription `incomplete` while its first invoice's payment is
-- pending (a bank debit paid through Checkout: ACH, SEPA, Bacs clear in days; the
-- session completes with payment_status `unpaid`), and moves it to `active` when
-- the payment succeeds. billing_live_status left `incomplete` out, and the paid
-- session's block (billing_checkout_paid_pending) lifts once any subscription is
-- recorded: with no instance running yet, the customer could check out again,
-- pay by card, and be billed twice when the debit cleared. `incomplete` now counts
-- as live; a first payment given up ends in `incomplete_expired` (at most 23 hours
-- after a failure, says Stripe), which lifts the refusal.
--
-- Redefines public.billing_live_status whole from its last definition
-- (132_checkout_after_subscription.sql), unchanged but for the status list. CREATE
-- OR REPLACE keeps its grants; billing_account and billing_checkout_older_open
-- read it.

CREATE OR REPLACE FUNCTION public.billing_live_status(p_account_id uuid)
RETURNS public.subscription_status
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT s.status FROM public.subscriptions s
     WHERE s.account_id = p_account_id
       AND s.status IN ('incomplete', 'trialing', 'active', 'past_due', 'unpaid', 'paused')
     ORDER BY s.updated_at DESC, s.id LIMIT 1;
$$;
