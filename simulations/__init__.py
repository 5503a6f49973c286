"""The runners a user calls: a Flower simulation (:mod:`run`), the epsilon sweep (:mod:`sweep`),
and a finished run's evaluation (:mod:`evaluate`, :mod:`attack`, :mod:`audit`, :mod:`report`).
Nothing else imports them."""
